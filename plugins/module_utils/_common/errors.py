# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""The one base of the collection's domain errors: each module's main()
catches it once and turns it into one fail_json with its message."""

from __future__ import annotations


class LivecloneError(Exception):
    """A refusal or a failure whose message says what happened and what to do."""
