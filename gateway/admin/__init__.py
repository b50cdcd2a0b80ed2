"""The admin API: a separate listener (loopback by default) under ``/admin/v1``."""

from gateway.admin.app import create_admin_app
from gateway.admin.auth import ROLES, Principal, create_token, token_hash

__all__ = ["ROLES", "Principal", "create_admin_app", "create_token", "token_hash"]
