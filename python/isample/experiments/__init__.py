"""Experiment runner for isample: the seed paper's study and more, from the ``isample`` command.

Not imported by ``import isample``, so the library stays light; import the modules directly:

>>> from isample.experiments import augment, data, models
>>> ds = data.load_dataset("fashion-mnist")        # uint8 tensors in memory, with mean/std
>>> model = models.build_model("small_cnn", ds.num_classes, ds.in_channels, ds.image_size)
>>> x = augment.normalize(augment.random_crop_flip(ds.train_images[:128]), ds.mean, ds.std)

Modules:

- ``data``: ``load_dataset`` (CIFAR-10/100, Fashion-MNIST, MNIST), ``long_tailed``, ``subset``;
- ``augment``: batched random crop + horizontal flip, and normalisation, on any device;
- ``models``: the CIFAR ResNet18 of the seed paper and a small CNN for CPU-sized studies;
- ``config``: ``RunConfig`` and the presets of the paper's Appendix A;
- ``train``: the training loop (metrics per epoch, Appendix C time split, exact resume);
- ``world``: the world a run trains in (one process, or ``distributed_run`` under torchrun:
  DDP, the distributed sampler, scorer ranks); ``evaluation``: a model on a split;
- ``scorers``: scoring workers beside a run (``RunConfig.scorers``, the second seed's system);
- ``plots`` and ``report``: the paper's figures 1-6 and a markdown table from run folders;
- ``schedule``: a study's runs a few at a time (``isample study NAME --jobs J``), with an ETA;
- ``variance``, ``variance_study``, ``variance_report``: the exact variance of the
  importance-sampled gradient under each proposal (``isample study variance``).
"""
