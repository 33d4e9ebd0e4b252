"""Model families: Hugging Face tensor names per family, and the generic MoE decoder split
into an attention half and an expert half."""
