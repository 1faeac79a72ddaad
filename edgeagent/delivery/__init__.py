"""Delivery by content (docs/bundle.md): the delivery index, wire encodings, the device's
content-addressed store, HTTP(S) downloads, and the fetcher that installs a (partial) bundle
from only the objects the device needs."""
