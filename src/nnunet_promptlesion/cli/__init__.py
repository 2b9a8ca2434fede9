"""Console entry points (``[project.scripts]`` in pyproject.toml): parse the arguments, call the library.

A command imports the library inside its functions, once the arguments are parsed: torch costs ~1 s CPU at import,
nnU-Net ~1.4 s with it and MONAI ~2.6 s more (user+sys CPU of a fresh interpreter, as benchmarks/bench_startup.py
measures), and ``--help`` or a mistyped option must answer at once. Those imports point here; what a parser needs
(defaults shown in ``--help``) and light modules sit at the top.
"""
