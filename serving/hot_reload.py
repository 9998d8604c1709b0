"""A running server follows its export folder: when `twotower export` or `update --export` replaces
the folder (a new `export_id` in export.json), the new model is loaded in the background and
swapped in (`Recommender.swap`); requests never wait for the load.

`write_exported` renames a complete folder into place, so a load that starts and ends with the same
export id read every file from one export; a load that overlapped a replacement sees a different id
at the end (or a missing file) and is retried at the next poll."""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from twotower.serving.export_format import load_exported
from twotower.serving.recommender import Recommender

log = logging.getLogger("twotower.serve")


def export_id(folder: Path) -> str | None:
    """The export id in `folder/export.json`, or None while it is absent or being replaced."""
    try:
        return json.loads((folder / "export.json").read_text()).get("export_id")
    except (OSError, ValueError):
        return None


def reload_if_changed(recommender: Recommender, folder: Path) -> bool:
    """Swap in the export in `folder` if it is not the one served; True when it did."""
    seen = export_id(folder)
    if seen is None or seen == recommender.export_id:
        return False
    try:
        exported = load_exported(folder)
    except (OSError, ValueError) as exc:  # replaced while we read it: try again next time
        log.warning("reload of %s failed (%s); retrying at the next poll", folder, exc)
        return False
    if exported.export_id != seen or export_id(folder) != seen:
        return False
    carried = recommender.swap(exported)
    log.info("now serving export %s from %s (%d items, %d live-added items carried over)",
             seen, folder, len(exported.item_ids), carried)
    return True


class ExportWatcher:
    """A daemon thread polling `folder` every `interval` seconds while the server runs."""

    def __init__(self, recommender: Recommender, folder: str | Path, interval: float):
        self.recommender, self.folder, self.interval = recommender, Path(folder), interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="export-watcher", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                reload_if_changed(self.recommender, self.folder)
            except Exception:  # never let the watcher die: the old model keeps serving
                log.exception("reload of %s failed; the served model is unchanged", self.folder)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
