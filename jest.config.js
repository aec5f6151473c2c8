// Test tiers (see README "Tests"): unit needs nothing; kernel needs root, netns,
// cgroup v2 and bpffs; pipy needs a Pipy binary (PIPY_BIN or PATH); e2e runs the lab.
const common = {
  preset: 'ts-jest/presets/default-esm',
  testEnvironment: 'node',
  moduleNameMapper: { '^(\\.{1,2}/.*)\\.js$': '$1' },
  // .cache holds build trees (the arm64 proof copies the project there): not modules of ours.
  modulePathIgnorePatterns: ['<rootDir>/.cache/'],
  transform: {
    '^.+\\.ts$': ['ts-jest', { useESM: true, diagnostics: false }],
  },
};
const tier = (name, extra = {}) => ({
  ...common,
  displayName: name,
  testMatch: [`<rootDir>/test/${name}/**/*.test.ts`],
  ...extra,
});
const kernelHooks = {
  globalSetup: '<rootDir>/test/support/kernel-setup.ts',
  globalTeardown: '<rootDir>/test/support/kernel-teardown.ts',
};
export default {
  projects: [
    tier('unit'),
    tier('kernel', kernelHooks),
    tier('pipy', kernelHooks),
    tier('e2e', kernelHooks),
  ],
  testTimeout: 60000,
};
