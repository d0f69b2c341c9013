"""Embed-and-search: :class:`Retriever` (FAISS index + durable SQLite store, filters, hubness correction, index
snapshots with replay), the query batcher, the HTTP app (:func:`metrank.search.server.create_app`) and its page."""

from metrank.search.batcher import QueryBatcher
from metrank.search.hubness import HUBNESS, NNN, HubnessState, QBNorm, create_hubness
from metrank.search.retriever import Hit, Retriever
from metrank.search.snapshot import Snapshotter
from metrank.search.store import Item, ItemStore

__all__ = [
    "Retriever",
    "Hit",
    "Item",
    "ItemStore",
    "QueryBatcher",
    "Snapshotter",
    "QBNorm",
    "NNN",
    "HubnessState",
    "HUBNESS",
    "create_hubness",
]
