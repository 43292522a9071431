"""The HTTP layer: FastAPI app, protocol models, serving objects, routers."""
