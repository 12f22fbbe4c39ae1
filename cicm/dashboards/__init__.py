"""The operators' dashboard: a read-only Dash app over the store (`cicm dashboard`; docs/dashboard.md)."""
