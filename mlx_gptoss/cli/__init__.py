"""``mlx-gptoss``: thin commands over the library, one module per command group.

Each command parses its options, calls the library, prints. The library (and mlx) is imported
inside each command, so ``mlx-gptoss --help`` and a command's ``--help`` stay instant; that is the
one reason for imports inside functions in this package. Options used by several commands are
defined once in :mod:`.common`.

- :mod:`.models`: ``convert``, ``list``, ``rm``, ``export``
- :mod:`.generate`: ``generate``, ``chat``
- :mod:`.serve`: ``serve``
- :mod:`.doctor`: ``doctor``
- :mod:`.lora`: the ``lora`` group, ``lora train``; :mod:`.adapters`: ``lora fuse``
- :mod:`.testing`: ``testing tiny-model``
"""

from __future__ import annotations

import click

from . import adapters  # noqa: F401 - registers the adapter-file commands on the lora group
from .doctor import doctor
from .generate import chat, generate
from .lora import lora
from .models import convert, export, list_, rm
from .serve import serve
from .testing import testing


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-gptoss")
def main() -> None:
    """gpt-oss on MLX: convert released checkpoints, generate text, chat, serve, fine-tune."""


for command in (convert, list_, rm, export, generate, chat, serve, doctor, lora, testing):
    main.add_command(command)
