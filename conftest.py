"""Repository-wide pytest hooks.

nbval compares every output of the golden notebooks except images (``image/png``, ``image/jpeg``):
pixels are not text and may legitimately differ between machines. A figure shown through
``bs.book.glue`` (``{glue:figure}``) is stored under the mime type
``application/papermill.record/image/png``, which nbval does not know is an image; it is skipped
here in the same way. Everything textual, including glued numbers, is still compared strictly.
"""

GLUED_IMAGES = ("application/papermill.record/image/png", "application/papermill.record/image/jpeg",
                "application/papermill.record/image/svg+xml")


def pytest_collection_modifyitems(session, config, items):
    seen = set()
    for item in items:
        parent = getattr(item, "parent", None)
        if parent is None or id(parent) in seen or not hasattr(parent, "skip_compare"):
            continue
        seen.add(id(parent))
        parent.skip_compare = tuple(parent.skip_compare) + GLUED_IMAGES
