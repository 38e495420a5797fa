"""smoothguide benchmarks: query smoothing, guided-step overhead, memory and scaling.

Run ``python -m benchmarks`` (the quick variant, a few minutes on 2 CPU cores) or
``python -m benchmarks --full``; ``--out benchmarks/README.md`` writes the report
(tables, machine, versions, command) and ``benchmarks/figures/*.png`` the plots.
Every number in the report comes from the run that wrote it.

Modules
-------
config
    What each variant measures (shapes, sigmas, repeats, sizes).
timing, machine
    Median-of-repeats timer; machine, versions and environment description.
official
    The official SEG-SDXL blur (``gaussian_blur_2d``), re-implemented for comparison.
methods
    Every smoothing method under comparison, one callable each.
smoothing, guided_step, memory, scaling
    The four measurements of issue 8.
report
    Markdown report writer.
"""
