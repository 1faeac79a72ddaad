"""The host-side converter: prune, quantize and convert models, measure every step, package the result.

Entry points: ``edgectl convert`` (:mod:`converter.cli`) and :func:`converter.api.convert`.
See ``docs/converter.md``. Nothing on a device imports this package.
"""
