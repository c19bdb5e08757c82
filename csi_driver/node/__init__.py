"""Node-side helpers: mount state, bind mounts, filesystem statistics."""
