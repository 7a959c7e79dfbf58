"""The local fleet that tests, benchmarks and scripts start: not part of torchx-diloco's API, not in the wheel.

- :mod:`~torchx_diloco._fleet.testing`: lighthouses and replica groups as real processes, their environments,
  the metrics they wrote;
- :mod:`~torchx_diloco._fleet.faulty`: ``faulty://``, a filesystem whose writes fail on purpose;
- :mod:`~torchx_diloco._fleet.netlab`: network namespaces for groups (shaped and cut links);
- :mod:`~torchx_diloco._fleet.chaos`: the chaos harness (kills at chosen instants, the single-history audit);
- :mod:`~torchx_diloco._fleet.zygote`: the tests' trainers and lighthouses forked from one interpreter that
  imported them once.

No module of the package outside this folder imports it.
"""
