"""Names in the catalog that are read without SQLAlchemy, importable without it.

``facefind query`` serves a current snapshot after two tiny reads of an SQLite catalog through
the stdlib's sqlite3 (facefind.db.snapshot.fast), because importing SQLAlchemy would cost it more
than the query itself. db/schema.py declares its tables with these names, so the shortcut always
reads the schema that SQLAlchemy writes.
"""

from __future__ import annotations

# meta: key/value rows
META = "meta"
META_KEY = "key"
META_VALUE = "value"
CATALOG_ID = "catalog_id"          # meta key: the random id a catalog gets when it is created
SCHEMA_VERSION_KEY = "schema_version"

# models: one row per checkpoint
MODELS = "models"
MODEL_ID = "id"
MODEL_SHA256 = "sha256"
MODEL_GENERATION = "generation"
MODEL_CHECKPOINT = "checkpoint"

# predictions: per (model, face)
PREDICTIONS = "predictions"
PREDICTION_MODEL = "model_id"
