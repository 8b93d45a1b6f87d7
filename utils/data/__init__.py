"""Data: image folders and their listing, tar shards, CIFAR, class names, image reading and
the bad-image policy, transforms, samplers and loaders, a run's datasets and loaders built from
its options, and the demo's generated dataset."""
