/** A field of one object is wrong: `field` in kubectl's dotted form. */
export class FieldError extends Error {
  constructor(
    readonly field: string,
    message: string,
  ) {
    super(message);
  }
}
