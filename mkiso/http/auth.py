"""Who is calling: the API keys (SPEC §6, §11).

``auth.api_key`` (or its file, or ``$MKISO_API_KEY``) is one key without a
name; ``auth.keys`` names keys, one per system or desk, so that the audit
trail can say who asked.  With named keys a caller sees and cancels only
its own jobs, and only the job's own caller is shown its download token;
a key named in ``auth.admin_keys`` sees every job.  A given key is
compared with every key, each in constant time, so the time taken tells
nothing about which one nearly matched.
"""

import hmac


class Keys:
    def __init__(self, auth):
        self.enabled = auth.enabled
        self._keys = [(None, auth.api_key.encode("utf-8"))] if auth.api_key else []
        self._keys += [(name, key.encode("utf-8")) for name, key in sorted(auth.keys.items())]
        self.named = bool(auth.keys)
        self.admins = set(auth.admin_keys)

    def identify(self, given):
        """(known, name): whether ``given`` is one of the keys, and its name (None for the unnamed key)."""
        given = (given or "").encode("utf-8", "replace")
        known, caller = False, None
        for name, key in self._keys:
            if hmac.compare_digest(given, key):
                known, caller = True, name
        return known, caller

    def allows(self, known):
        """Whether a caller with (or without) a known key may use the API."""
        return known or not self.enabled

    def sees(self, caller, job_caller):
        """Whether ``caller`` may see and cancel a job of ``job_caller``."""
        return not self.named or caller == job_caller or caller in self.admins
