"""What a researcher looks at: heatmaps, patches, grids, reports and multi-stage studies."""
