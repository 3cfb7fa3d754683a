"""State-dict helpers without Lightning: what nets, first stages and converters share when they load weights."""

from __future__ import annotations

import torch


def net_state_dict(ckpt: dict, prefix: str = "net.") -> dict[str, torch.Tensor]:
    """The trained network's weights in a lightgen training checkpoint: keys ``net.*`` (``prefix="ema."``: its
    EMA copy), prefix dropped."""
    return {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


def state_dict_mismatch(state: dict, target: dict, optional: set | frozenset = frozenset()) -> str:
    """What keeps ``state`` from loading strictly into a module whose state dict is ``target`` ("" if nothing).

    Names the first wrong shape, the missing keys (``optional`` ones excepted) and the unexpected ones, each with
    an example, for the one-sentence errors of the loaders.
    """
    missing = sorted(set(target) - set(state) - set(optional))
    unexpected = sorted(set(state) - set(target))
    shapes = [k for k in target if k in state and tuple(state[k].shape) != tuple(target[k].shape)]
    detail = []
    if shapes:
        detail.append(f"{shapes[0]} is {tuple(state[shapes[0]].shape)} vs {tuple(target[shapes[0]].shape)}")
    if missing:
        detail.append(f"{len(missing)} missing keys such as {missing[0]}")
    if unexpected:
        detail.append(f"{len(unexpected)} unexpected keys such as {unexpected[0]}")
    return "; ".join(detail)
