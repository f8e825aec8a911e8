# Namespace package shared with other cascade-* distributions (as upstream Cascade).
__path__ = __import__("pkgutil").extend_path(__path__, __name__)
