"""Embed-and-search: :class:`Retriever` (FAISS index + SQLite metadata, filters, hubness correction, crash-safe
snapshots), the HTTP app (:func:`metrank.search.server.create_app`) and its search page."""

from metrank.search.hubness import HUBNESS, NNN, HubnessState, QBNorm, create_hubness
from metrank.search.retriever import Hit, Retriever
from metrank.search.store import Item, ItemStore

__all__ = ["Retriever", "Hit", "Item", "ItemStore", "QBNorm", "NNN", "HubnessState", "HUBNESS", "create_hubness"]
