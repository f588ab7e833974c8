"""Imported by Python at the start of a test's subprocess (this folder first on PYTHONPATH): loopback only."""
import loopback_only

loopback_only.install()
