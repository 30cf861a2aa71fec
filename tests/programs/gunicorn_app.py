"""The smallest WSGI application, for gunicorn started by lazyd."""

import os


def app(environ, start_response):
    body = f"hello from gunicorn worker {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
