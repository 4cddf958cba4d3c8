"""Teacher-feature cache: run the teachers once over a dataset, train from the stored outputs.

Layout of a cache directory:
    manifest.json                 status ("building" until the last shard is written, then "complete"),
                                  identity (what the features depend on), layout, shapes, shard list + sha256,
                                  the first 16 hex digits of each data file's sha256 (to name changed files)
    view{v}/shard{k:05d}.safetensors   per teacher and level: features (S, C, h, w) in fp16, or int8 plus
                                  per-(sample, channel) float32 scales; S samples per shard; each shard's
                                  metadata carries the digest of the identity and shard size it was built for

Augmentation is handled by storing `views` augmented views of every sample: view v is the dataset's
training augmentation at epoch v (augmentation is a function of (seed, epoch, index)). Training at
epoch e reads view e % views, and the dataset is told the same epoch, so the student sees exactly
the image the cached features were computed from. Without `augment` the cache holds one view, of the
un-augmented images. The price: `views` different augmentations instead of one per epoch.

A cache is refused, with the differing fields named, when the recipe's teachers or data differ from those
it was built with: the data's sample count, ids and content (the sha256 of every image file, so that an
image replaced under its own name is noticed, with the changed files named) included. A shard whose bytes
do not match its sha256 is refused as corrupt. Building is resumable (finished shards are kept, once the
manifest written before the first shard shows that they were built for the same identity and layout),
reads the images with the recipe's loader workers, and runs on N processes (shard k on process k % N).

The package: `store` (the files and how they are written), `identity` (what the features depend on),
`builder` (`sak cache build`) and `reader` (`FeatureCache`, what training reads).
"""

from .builder import build_cache, check_build_options, check_disk_space
from .identity import content_digests, identity, ids_digest, teachers_identity, training_dataset
from .reader import CachedRows, FeatureCache, pin_threads
from .store import FORMAT, CacheError, CachePlan, cache_digest, describe, load_manifest, quantize, shard_name

__all__ = [
    "CacheError",
    "CachePlan",
    "CachedRows",
    "FORMAT",
    "FeatureCache",
    "build_cache",
    "cache_digest",
    "check_build_options",
    "check_disk_space",
    "content_digests",
    "describe",
    "identity",
    "ids_digest",
    "load_manifest",
    "pin_threads",
    "quantize",
    "shard_name",
    "teachers_identity",
    "training_dataset",
]
