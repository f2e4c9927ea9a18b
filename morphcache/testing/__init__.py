"""Test support shipped with the package: store factories, generated image folders, a real teacher-extracted store,
and a torchrun launcher. The test suite imports these from here (one import root, so plain ``pytest`` from the
repository root collects), and a plug-in's own tests can use them too.

- :mod:`morphcache.testing.stores`: ``make_spec``, ``make_image_table``, ``make_store`` (synthetic teacher-like tokens),
  ``make_image_store`` (real PNGs and stored views, synthetic tokens; no DALI or teacher needed).
- :mod:`morphcache.testing.images`: ``write_noise_pngs``.
- :mod:`morphcache.testing.teacher_stores`: ``build_teacher_store`` (PNGs -> DALI -> random timm teacher -> zarr).
- :mod:`morphcache.testing.ddp`: ``launch`` (torchrun from a test), ``read_rows``.
"""
