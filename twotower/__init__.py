"""twotower: text-aware two-tower recommenders, trained at scale and served in real time.

The import root of the repository's top-level folders (the packaging maps each one here):

    twotower.configs       typed config dataclasses, their YAML groups and loader
    twotower.modules       the model: item tower, user tower, losses, metrics (plain `nn.Module`s), and
                           what the model needs to read an item or a history (text, time gaps, actions)
    twotower.datamodules   raw data -> WebDataset shards, and reading them back for training
    twotower.trainers      fit, evaluate, update, export, sweeps (needs `pip install twotower[train]`)
    twotower.serving       an exported model: its format, the index, the recommender, the HTTP server
    twotower.streaming     the event stream that `serve` writes and `twotower learn` follows

`python -m twotower` (or the `twotower` command) is the command line: `twotower --help`."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("twotower")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
