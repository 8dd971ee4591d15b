"""The API and page routes, one APIRouter per concern; retrieval/web/app.py assembles them."""
