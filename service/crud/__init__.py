"""Data access for the API's routes: small keyword-only functions over one session each.

Routes parse HTTP and shape responses; what they read and write goes through here, so that no
route reaches into another's helpers. The job state machine (claims, leases, the reaper) is
``service.jobs``, which the worker shares.
"""
