"""Training on pre-extracted tokens (``python -m lightgen.extract first_stage=vq_small ...``): ``data=tokens``.

The latent DataModule on token shards (``lightgen.data.latents``, ``kind: tokens`` in the manifest):
memory-mapped int16/int32 code indices, the same resumable, world-size-independent sampler, batches
``{"tokens": long (B, h, w), "label": long (B,)}``. At start-up the manifest is checked against the
run's tokenizer: its class and settings, codebook size, token grid and the SHA-256 of its checkpoint file.

Flips: the sampler's flip bit selects the stored tokens of the flipped image (``flips=true`` at
extraction); tokens themselves are never flipped, so ``random_flip=true`` on a directory without flipped
copies is refused, and the default (``null``) flips exactly when the copies are there.
"""

from __future__ import annotations

from typing import Any

from lightgen.data.latents import LatentDataModule
from lightgen.data.shards import check_tokenizer, tokenizer_sha256
from lightgen.utils.errors import LightgenConfigError


class TokenDataModule(LatentDataModule):
    """Pre-extracted tokens from ``path``.

    Args (besides :class:`LatentDataModule`'s):
        random_flip: ``None`` (default): use the stored flipped copies when the directory has them;
            ``True`` requires them; ``False`` never flips.
        expected_codebook_size, expected_token_size: the run's tokenizer's K and token grid side.
        expected_checkpoint: the run's tokenizer checkpoint file (``None``: random weights); its SHA-256
            must be the one the manifest records.
    """

    KIND = "tokens"

    def __init__(
        self,
        path: str,
        batch_size: int,
        num_workers: int = 0,
        random_flip: bool | None = None,
        seed: int = 0,
        backend: str = "memmap",
        expected_first_stage: Any = None,
        expected_codebook_size: int | None = None,
        expected_token_size: int | None = None,
        expected_checkpoint: str | None = None,
        check_hashes: bool = False,
        shuffle: bool = True,
        num_classes: int | None = None,
        image_size: int | None = None,
        channels: int | None = None,
        litdata_dir: str | None = None,
    ):
        size = None if expected_token_size is None else int(expected_token_size)
        super().__init__(
            path,
            batch_size,
            num_workers=num_workers,
            random_flip=bool(random_flip),
            seed=seed,
            backend=backend,
            expected_first_stage=expected_first_stage,
            expected_shape=None if size is None else (size, size),
            check_hashes=check_hashes,
            shuffle=shuffle,
            num_classes=num_classes,
            image_size=image_size,
            channels=channels,
            litdata_dir=litdata_dir,
        )
        self.flip_setting = random_flip
        self.expected_codebook_size = expected_codebook_size
        self.expected_checkpoint = None if expected_checkpoint in (None, "") else str(expected_checkpoint)

    def _check_manifest(self, manifest: dict[str, Any]) -> None:
        check_tokenizer(
            manifest,
            self.path,
            self.expected_codebook_size,
            tokenizer_sha256(self.expected_checkpoint),
            checkpoint=self.expected_checkpoint,
        )
        if self.flip_setting and not manifest["flips"]:
            raise LightgenConfigError(
                f"data.random_flip=true but {self.path} holds no tokens of flipped images (flipping tokens is not "
                f"tokenizing the flipped image); extract with flips=true or set data.random_flip=false."
            )
        self.random_flip = bool(manifest["flips"]) if self.flip_setting is None else bool(self.flip_setting)

    @property
    def codebook_size(self) -> int:
        self.check()
        return int(self.manifest["codebook_size"])

    @property
    def token_size(self) -> int:
        self.check()
        return int(self.manifest["token_shape"][0])
