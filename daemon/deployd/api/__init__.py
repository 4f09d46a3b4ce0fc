"""HTTP: every FastAPI/Starlette/uvicorn import of the daemon lives in this package.

`app.create_app(parts)` assembles the routes from one `ApiParts` the service builds; each
route module's factory takes only the handles it uses, never the daemon itself.
"""
