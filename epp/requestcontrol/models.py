"""``GET /v1/models`` and ``GET /v1/models/{id}``, answered by the gateway from the pool's listing
(epp.signals.models) instead of one model server's: every model and adapter any pod serves."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote

import orjson

from epp.requestcontrol.refused import LocalAnswer, Refused

PATH = "/v1/models"


def models_answer(headers: Mapping[str, str], path: str, listing: Callable[[], list[dict[str, Any]]]
                  ) -> LocalAnswer | None:
    """The answer to a models request (None: not one). Raises Refused(404) for an unknown id."""
    if headers.get(":method", "GET") != "GET":
        return None
    path = path.split("?", 1)[0].rstrip("/")
    if path == PATH:
        return LocalAnswer(200, orjson.dumps({"object": "list", "data": listing()}))
    if path.startswith(PATH + "/"):
        wanted = unquote(path[len(PATH) + 1:])
        for entry in listing():
            if entry.get("id") == wanted:
                return LocalAnswer(200, orjson.dumps(entry))
        raise Refused(404, f"The model `{wanted}` does not exist.", param="model")
    return None
