"""The request-control plugin roles a config may list: parsers (what a body says), admitters
(after admission, before scheduling) and the token producer (the prompt's ids, before
everything that reads them)."""

from __future__ import annotations

from typing import Any

from epp.requestcontrol.admission import Admitter
from epp.requestcontrol.parsers import Parser
from epp.requestcontrol.tokens import Tokenizes

ROLES: tuple[tuple[type[Any], str], ...] = ((Admitter, "admitter"), (Tokenizes, "token producer"), (Parser, "parser"))
ROLE_METHODS: dict[type[Any], tuple[str, ...]] = {Admitter: ("admit",), Tokenizes: ("prepare", "close"),
                                                  Parser: ("parse",)}
