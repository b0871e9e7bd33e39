"""The one exception type the dataset layer raises for problems a user can fix."""

from __future__ import annotations

from atelier.errors import UserError


class DatasetError(UserError, ValueError):
    """A problem with the training data: the message names the path and the fix."""
