"""`facefind serve`: a FastAPI app (``app.create_app``) and the static page it serves (``static/``)."""
