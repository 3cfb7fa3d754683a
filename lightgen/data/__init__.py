from lightgen.data.base import ArrayImageDataset, IndexedDataModule
from lightgen.data.fashion_mnist import FashionMNISTDataModule
from lightgen.data.imagenet import ImageFolderDataModule, center_crop_arr
from lightgen.data.latents import LatentDataModule, LatentShardDataset, ShardDataset
from lightgen.data.sampler import InfiniteBatchSampler
from lightgen.data.synthetic import SyntheticDataModule, make_synthetic_images
from lightgen.data.tokens import TokenDataModule

__all__ = [
    "ArrayImageDataset",
    "IndexedDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "center_crop_arr",
    "InfiniteBatchSampler",
    "LatentDataModule",
    "LatentShardDataset",
    "ShardDataset",
    "SyntheticDataModule",
    "TokenDataModule",
    "make_synthetic_images",
]
