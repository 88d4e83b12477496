# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.
"""The shared cache layout (DistroClone Backup's): the layout and its reader, snapper's command line,
the options that name a cache. Read by snapper_cache, snapper_cache_info and live_iso's cache source."""
