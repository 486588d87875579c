"""Training the side network (backbone frozen), its data streams, the feature cache and
the token cache's fit."""
