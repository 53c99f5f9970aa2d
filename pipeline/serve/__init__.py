"""The online service: Ray Serve endpoints, what requests may hold, and browsing a dataset's rarest rows."""
