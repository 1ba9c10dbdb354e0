"""``python -m mlx_gptoss.cli``: the same as the ``mlx-gptoss`` command."""

from . import main

main()
