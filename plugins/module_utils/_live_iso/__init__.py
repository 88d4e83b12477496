# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.
"""The live_iso resource: desired, read, plan, apply, run, and the source, image and boot steps."""
