"""Command groups beyond run/validate/ui. Each module exposes `register(app)`; the CLI calls it.

Modules here only parse options and call library code; they import heavy libraries lazily so
`factory --help` stays fast.
"""

from factory.commands import bench, compare, convert, corpus, launch, merge, vocab

ALL = (vocab, corpus, convert, merge, bench, compare, launch)
