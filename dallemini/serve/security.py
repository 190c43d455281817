"""The API key check: a FastAPI dependency that the OpenAPI schema declares as two security schemes.

No `from __future__ import annotations` here: FastAPI reads the dependency's annotations at run time.
"""

import secrets
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, HTTPException
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer


def api_key_dependency(api_key: str) -> Callable[..., Any]:
    """A dependency that lets a request through only with the API key (declared in the OpenAPI schema)."""
    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: KEY")

    async def check(
        cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        x_key: Annotated[str | None, Depends(header)],
    ) -> None:
        want = api_key.encode()
        for given in (cred.credentials if cred else None, x_key):
            if given is not None and secrets.compare_digest(given.encode(), want):
                return
        raise HTTPException(
            401,
            "missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
            headers={"WWW-Authenticate": "Bearer"},
        )

    return check
