"""Privacy report rendering: pure modules that turn a report document (plain dicts) into JSON, CSV and PDF.

The document itself is built from the database by privacy.services.reports.
"""
