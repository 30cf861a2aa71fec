"""Small services bundled with lazyd, so that `lazyd demo` runs anywhere."""
