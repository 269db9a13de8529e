"""A generated benchmark where the right attribution is known (``docs/benchmark.md``).

- ``generate``: the dataset (shapes on natural-photo backgrounds, one class-deciding object per
  image, its ground-truth mask) written as Parquet in the layout users bring;
- ``models``: ``BenchmarkResNet``, plain or anti-aliased (blur before every subsampling);
- ``train``: training, held-out accuracy, caching (``pretrained``);
- ``build``: what ``distributed-attr benchmark build`` runs.
"""
