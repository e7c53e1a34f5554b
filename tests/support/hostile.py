"""A running listener for the hostile-input tests: its configuration, database, storage, and
what it stored (rows, files, temporaries)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from dicom_node import db
from dicom_node.config import NodeConfig, parse_config
from dicom_node.ingest import Listener
from dicom_node.storage import Storage
from tests.support.node import free_port


@dataclass
class RunningListener:
    config: NodeConfig
    listener: Listener
    storage: Storage
    factory: Any
    engine: Any

    @property
    def port(self) -> int:
        return self.config.listener.port

    def row(self, sop_uid: str) -> db.Instance | None:
        with db.session_scope(self.factory) as s:
            return s.execute(select(db.Instance).where(db.Instance.sop_instance_uid == sop_uid)).scalar_one_or_none()

    def files_named(self, sop_uid: str) -> list[Path]:
        return [p for p in self.storage.root.rglob("*") if p.is_file() and sop_uid in p.name]

    def temporaries(self) -> list[Path]:
        return [p for p in self.storage.root.rglob(".*") if p.is_file()]

    def stop(self) -> None:
        self.listener.stop(timeout=2)
        self.engine.dispose()


def start_listener(config: NodeConfig) -> RunningListener:
    """A migrated database, storage under ``config.data_dir`` and a started listener."""
    db.upgrade_database(config.database_url)
    engine = db.make_engine(config.database_url)
    factory = db.make_session_factory(engine)
    storage = Storage(config.data_dir / "instances", config.storage.min_free_mb)
    listener = Listener(config, storage, factory)
    listener.start()
    return RunningListener(config, listener, storage, factory, engine)


def hostile_config(root: Path, **listener: Any) -> NodeConfig:
    """A node configuration on a free loopback port with data under ``root`` (defaults otherwise)."""
    return parse_config(
        {
            "node": {"data_dir": str(root / "data")},
            "listener": {
                "port": free_port(),
                "allowed_callers": [{"ae_title": "TESTSCU", "hosts": ["127.0.0.1"]}],
                **listener,
            },
            "storage": {"min_free_mb": 0},
        },
        source="hostile test",
        base_dir=root,
    )
