# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.
"""The shared bottom layer: command running, files beneath a root, mounts, locks, btrfs, rsync, ssh,
the root-tree policy, texts for config files, PE images, the plan/apply contract. Imports no resource."""
