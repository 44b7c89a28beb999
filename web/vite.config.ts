/// <reference types="vitest/config" />
import react from "@vitejs/plugin-react";
import { defineConfig } from "vite";

// The Flask app serves dist/: index.html at / (and at every client route), the hashed
// assets under /static/, which the API keeps for the page (see src/mailroom/webpage.py).
export default defineConfig({
  plugins: [react()],
  base: "/",
  build: {
    outDir: "dist",
    assetsDir: "static",
    emptyOutDir: true,
    sourcemap: false,
  },
  server: {
    // `npm run dev` against a running `mailroom run` (port 8000 by default).
    proxy: {
      "/api": "http://127.0.0.1:8000",
      "/healthz": "http://127.0.0.1:8000",
    },
  },
  test: {
    environment: "jsdom",
    globals: true,
    include: ["src/**/*.test.{ts,tsx}"],
    restoreMocks: true,
  },
});
