"""Data layer: volume I/O, layouts (LLD-MMRI crops, generic subjects/, unlabelled folders), the phantom,
patient-level splits, cached preprocessing, datasets and LightningDataModules."""
