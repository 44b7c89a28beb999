"""The ``/docs`` page: Swagger UI (shipped offline in flask-openapi3-swagger) over /openapi.json."""

from __future__ import annotations

from flask import render_template_string
from flask_openapi3_swagger.templates import swagger_html_string

# The bundled page loads its assets relative to itself; they are served under /docs/swagger.
_PAGE = swagger_html_string.replace("<head>", '<head>\n    <base href="/docs/">', 1)


def render_docs() -> str:
    return render_template_string(_PAGE, doc_url="/openapi.json", swagger_config=None, oauth_config=None)
