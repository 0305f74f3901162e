"""Small server routes for the frontend: backend availability and the last path summaries."""
from __future__ import annotations

import comfy.model_management
from aiohttp import web

from ..kernels import registry
from . import backend_apply

_registered = False


def backends_payload() -> dict:
    device = comfy.model_management.get_torch_device()
    return {"device": registry.describe_device(device),
            "backends": [a.to_json() for a in registry.availability(device)]}


def register() -> None:
    global _registered
    if _registered:
        return
    from server import PromptServer

    routes = PromptServer.instance.routes

    @routes.get("/nvfp4/backends")
    async def get_backends(request):
        return web.json_response(backends_payload())

    @routes.get("/nvfp4/paths")
    async def get_paths(request):
        return web.json_response(backend_apply.LAST_SUMMARY)

    _registered = True
