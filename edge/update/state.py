"""The device's update state, ``state.json`` in the state folder (written durably: temp, fsync, rename).

* ``release_floor``: the highest release ever committed. Anti-rollback: a
  bundle with a lower release is refused, an equal one only re-installed on
  request. It lives here, outside any bundle, and only ever grows.
* ``pending``: set just before the ``current`` / ``previous`` links are
  switched and cleared when the switch is committed (health check passed) or
  undone. Found set at start-up, it means the agent died mid-switch: the links
  are put back as they were (:meth:`edge.update.installer.Installer.recover`).
* ``history``: the last events, for ``edge update status``.

Which version is active is not stored here: the ``current`` link is the truth.
"""

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional

from edge.update.durable import write_durably
from edge.update.errors import UpdateError
from edge.update.manifest import format_timestamp

STATE_FILE = "state.json"
STATE_FORMAT = 1
MAX_HISTORY = 50


@dataclass(frozen=True)
class PendingSwitch:
    """A switch in progress: ``version`` is being made current; the links before it, to restore."""

    action: str  # "apply" or "rollback"
    version: str
    current_before: Optional[str]
    previous_before: Optional[str]

    def to_dict(self) -> dict:
        return {"action": self.action, "version": self.version, "current_before": self.current_before,
                "previous_before": self.previous_before}


@dataclass
class UpdateState:
    release_floor: int = 0
    pending: Optional[PendingSwitch] = None
    history: List[dict] = field(default_factory=list)

    def record(self, action: str, version: Optional[str], result: str, detail: str = "",
               now: Optional[datetime] = None) -> None:
        self.history.append({"time": format_timestamp(now or datetime.now(timezone.utc)), "action": action,
                             "version": version, "result": result, "detail": detail})
        del self.history[:-MAX_HISTORY]

    def to_dict(self) -> dict:
        return {"format": STATE_FORMAT, "release_floor": self.release_floor,
                "pending": self.pending.to_dict() if self.pending else None, "history": self.history}

    def save(self, state_dir) -> None:
        write_durably(Path(state_dir) / STATE_FILE, (json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n").encode())

    @classmethod
    def load(cls, state_dir) -> "UpdateState":
        """The saved state; a fresh one where none was saved yet."""
        path = Path(state_dir) / STATE_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            return cls()
        except OSError as e:
            raise UpdateError(f"{path}: cannot read the update state: {e.strerror or e}") from None
        try:
            obj = json.loads(text)
            if obj.get("format") != STATE_FORMAT:
                raise ValueError(f"format {obj.get('format')!r}")
            floor = obj["release_floor"]
            if not isinstance(floor, int) or isinstance(floor, bool) or floor < 0:
                raise ValueError(f"release_floor {floor!r}")
            pending = obj["pending"]
            if pending is not None:
                pending = PendingSwitch(**pending)
            history = obj["history"]
            if not isinstance(history, list):
                raise ValueError("history is not a list")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UpdateError(f"{path}: the update state is damaged ({e}); inspect it before any update") from None
        return cls(floor, pending, history)
